"""The worker and what is its alone: fetching datum sets, laying out /pfs, running user code (a
command in a sandbox, or a function in the worker's process), storing its outputs, reporting the
results, and marking its pod busy or idle.

Nothing is imported here, so that a module needing one part (the pod cost marker) does not load
the rest.
"""
