"""Faults (killed processes, damaged files, full disks, bad input) through the commands users run."""
