"""How easily a checkpoint is fooled (issue 29): adversarial images and the metrics under them.

pgd.py   projected gradient ascent (ℓ∞, ℓ2) on images, the zero-shot and retrieval losses it ascends
run.py   `lipkit attack`: perturb a split's images once, score clean and attacked with eval's function
"""
