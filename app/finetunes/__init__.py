"""Fine-tuning generators (issue 22): a fine-tune is a job of kind `finetune` whose chunk i
trains member i (one model per condition, or one joint model), on the `gpu` queue. service.py
validates a request and records exactly which images train; registry.py turns a finished
member into a registered model; views.py is the public view. The training loop is
models/finetune.py and the task workers/finetune.py.
"""
