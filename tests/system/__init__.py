"""
System suites that run real processes and take minutes: C{make crash}
(L{tests.system.crash}) and C{make interop} (L{tests.system.interop}).
Their module names do not start with C{test_}, so C{make test} leaves them
out.
"""
