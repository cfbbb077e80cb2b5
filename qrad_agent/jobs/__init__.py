"""Jobs from the fleet: the spec, the ledger, the sandboxed runner and the scheduler that
fills the allocator's slots with them (policy in ``core/jobs.py``)."""
