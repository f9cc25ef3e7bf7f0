"""
The process wiring: configuration, building the application, the receiver
processes (master and child side), SIGHUP reloads.
"""
