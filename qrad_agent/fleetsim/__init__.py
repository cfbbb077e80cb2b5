"""Fleet simulation: many radiators, the dispatcher and a job trace on one simulated clock."""
