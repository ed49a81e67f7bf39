"""Choosing and comparing: recommend (rules, probes, LogME, the race), the starter file of init, compare, curves, report, plots, show."""
