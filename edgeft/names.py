"""The names each choice accepts, one list each, importing nothing: the CLI's `--help`, the step
configs (edgeft.config) and the modules that implement the choices all read them from here."""

METRICS = ("accuracy", "macro_f1", "loss")
HEAD_FAMILIES = ("softmax", "ridge")  # the head a bundle answers with and retrains (runtime/ridge.py)
METHODS = ("head", "lora", "ia3", "full", "bitfit", "partial", "gradual", "prompt", "prefix")  # edgeft.methods
PROMPT_METHODS = ("prompt", "prefix")  # virtual tokens in the input, or keys/values per layer (edgeft.prompts)
POOLINGS = ("mean", "cls", "pooler", "max")  # edgeft.models
VIRTUAL_TOKENS = 10  # prompt and prefix tuning's default count (TrainConfig.virtual_tokens)
