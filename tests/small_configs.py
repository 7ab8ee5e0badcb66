"""Config overrides that make every stage run in seconds on 2 CPU cores (shared by tests)."""

SMALL = ["prepare.synthetic.train_size=400", "prepare.synthetic.eval_size=32",
         "prepare.tokenizer.vocab_size=400", "model.tiny.hidden_size=64",
         "model.tiny.head_dim=16", "model.tiny.intermediate_size=128",
         "model.tiny.num_hidden_layers=2", "base.train.steps=30", "base.train.micro_batch_size=16",
         "base.train.checkpoint_every=10", "base.train.bf16=false", "base.accuracy_items=2",
         "ic.phases.0.steps=6", "ic.phases.1.steps=6", "ic.phases.2.steps=6",
         "ic.train.checkpoint_every=2", "ic.train.log_every=1", "ic.train.bf16=false",
         "ic.accuracy_items=2",
         "lora.train.steps=8", "lora.rank=4", "lora.train.bf16=false",
         "lora.train.checkpoint_every=4"]

# verify / evaluate on a barely trained model: the checks are exact whatever the quality.
DOWNSTREAM = ["verify.prompts=6", "verify.max_new_tokens=12", "verify.strides=[2, 4]",
              "verify.exactness.prompts=1", "verify.exactness.samples=300",
              "verify.exactness.continuation=2",
              "evaluate.benchmarks=[tiny_arithmetic, tiny_code]", "evaluate.limit=3",
              "evaluate.sampling.max_new_tokens=12", "evaluate.batch_size=8",
              "evaluate.overrides={}",
              # A barely trained model is not faster than AR: measure, do not gate speed.
              "gate.concurrencies=[1, 2]", "gate.repeats=1", "gate.min_requests=2",
              "gate.output_tokens=8", "gate.min_speedup={}", "gate.max_quality_drop=100"]
