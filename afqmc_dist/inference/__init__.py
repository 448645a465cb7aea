"""Predicting and testing files of any size: streamed, in constant memory, resumable, on any number of processes.

    scan.py     the first pass: every line checked before the model is loaded, holding nothing (ids on disk)
    engine.py   the model over the file piece by piece, on every process, results gathered in input order
    pieces.py   OUTPUT.parts/: the pieces written as they are done, kept by a rerun, assembled into OUTPUT
    jobs.py     predict into OUTPUT, onto stdout, or test (metrics from counts)
"""
