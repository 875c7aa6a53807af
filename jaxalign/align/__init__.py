"""Pair alignment: the Online Field Finetuner (`finetuner`), SEAMLeSS / finetuner pair alignment
(`pair`) and block matching (`blockmatch`)."""
