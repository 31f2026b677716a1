"""Evaluation: how good is a model, measured on data it was not trained on.

One module per kind of measurement, each usable on its own (trainers call bits_per_byte while
training; scripts/eval_bench.py runs them on several models and prints a table):

    scoring.py     the one batched forward pass they share: log-probabilities of many token
                   sequences, packed into batches by a token budget
    bpb.py         bits per byte of held-out text (tokenizer-independent)
    choice.py      multiple choice: jsonl continuations (accuracy, acc_norm) and the
                   C-Eval / CMMLU CSV folders (answer letter after the standard prompt, few-shot)
    generative.py  greedy answers through the generation engine, checked against a reference
                   (numbers compared as numbers, GSM8K's `#### N` understood)
    judge.py       an OpenAI-compatible endpoint scores each answer 0-10
    data.py        reading the files (jsonl, .txt, CSV folders) with errors that name file and line
    report.py      the table, the JSON file and the chart

A package of its own (not a file in model/): the tasks share data readers and reporting but
nothing of the model's code, and trainer/ imports evaluation.bpb without pulling in the rest.
"""
