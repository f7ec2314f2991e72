"""Evaluation package (being split out of lopt.evaluate); ``suite`` holds the retention suite."""
