"""Few-shot adaptation of a trained checkpoint (issue 27): K labelled images per class adapt a frozen
model, and the result is an ordinary checkpoint that eval, embed, serve and every export read.

    few_shot.py   K shots per class drawn with a seed; CoOp's base/novel split of the classes
    lora.py       LoRA (Hu et al., 2022) on a tower's linear weights, merged into them afterwards
    learners.py   what each method trains and its logits (CoOp, CLIP-Adapter, Tip-Adapter: models/)
    run.py        `lipkit adapt`: the classification loss over the shots, training, saving
"""
