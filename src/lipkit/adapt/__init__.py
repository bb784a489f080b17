"""Few-shot adaptation of a trained checkpoint (issue 27): K labelled images per class adapt a frozen
model (the shots: lipkit.data.few_shot), and the result is an ordinary checkpoint that eval, embed, serve and every export read.

    lora.py       LoRA (Hu et al., 2022) on a tower's linear weights, merged into them afterwards
    learners.py   what each method trains and its logits (CoOp, CLIP-Adapter, Tip-Adapter: models/)
    run.py        `lipkit adapt`: the classification loss over the shots, training, saving
"""
