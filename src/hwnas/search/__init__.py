"""Search drivers (pymoo NSGA-II, Optuna samplers, random), budgets, Pareto fronts, study storage and reports."""
