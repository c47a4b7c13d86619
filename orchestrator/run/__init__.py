"""Everything inside a rank: process group, model set-up and strategies, the training loop,
checkpoints, evaluation, metrics and W&B, inference, int8 models. Never imports the planner or a
launcher.
"""
