"""Training: the loop and what each optimizer step is made of.

    loop.py         Trainer: set-up, the epochs, one step, evaluation, checkpoints, stop signals
    loss.py         the loss of a micro-batch: the mean over exactly the pairs of the global batch
    optimizer.py    AdamW and its parameter groups
    steps.py        one optimizer step under every engine (clipping, the fp16 scaler, skipped updates)
    schedule.py     how long training runs and how the learning rate moves
    selection.py    which evaluation is the best so far, and early stopping
    throughput.py   the loss and throughput of each logging window
"""
