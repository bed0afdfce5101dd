"""One training run, framework-free: data, candidates, schedule, side-task policy, job, session."""
