"""Stack alignment: blocks of sections aligned by vector voting (`block`), blocks chained into a stack
with composition and decay (`chain`), drift removal (`drift`), refinement to neighbours (`refine`) and
rendering (`render`)."""
