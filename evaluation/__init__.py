"""Full-catalog ranking evaluation and the baselines every model is compared with."""
