"""The remediation ladder: bring a faulty GPU back to service without a person on site.

catalogue.py (XID -> remedy, after NVIDIA's Xid catalogue), ladder.py (the pure planner),
diagnostics.py (the checks and the time-bounded commands), manager.py (the daemon's cycle listener
that runs the planner's steps). docs/operations.md, "The remediation ladder", tells an operator.
"""
