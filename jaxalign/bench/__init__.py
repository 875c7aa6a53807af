"""Benchmarks: ground-truth distortions (`groundtruth`), synthetic EM (`synthetic`), evaluation of
aligners (`evaluation`) and reports (`report`)."""
