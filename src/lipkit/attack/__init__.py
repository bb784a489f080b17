"""How easily a checkpoint is fooled, and a defence (issue 29).

pgd.py        projected gradient ascent (ℓ∞, ℓ2) on images, the zero-shot and retrieval losses it ascends
sga.py        SGA's set-level guided image loss (texts × scales)
universal.py  one universal perturbation learned with C-PGC's contrastive loss; the random baseline
words.py      caption word substitution with the text tower's embedding neighbours
scoring.py    the task's targets, answers and metrics (eval's function), for the source and transfer targets
run.py        `lipkit attack`: perturb a split once, score clean / attacked (/ random), transfer, save
report.py     OUT/report.html: metrics, transfer table, the universal δ, a gallery of pairs
harden.py     `lipkit harden`: TeCoA / FARE adversarial fine-tuning of the image tower
"""
