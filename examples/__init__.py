"""
Example plugins, and their tests written with relay.testing (`make test`
runs them).
"""
