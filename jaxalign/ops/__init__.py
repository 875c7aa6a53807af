"""Array kernels: pure functions of arrays (fields, losses, tear handling, voting, decay, metrics,
image preprocessing). They import only jax, numpy, `jaxalign.errors` and one another
(tests/test_architecture.py checks it)."""
