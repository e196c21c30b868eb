"""The names of the conditions a model reads (section 3.1), in a module without torch, so that
configs can be checked (and `--help` printed) without importing it. `edify.conditioning` holds
the tensors."""

CONDITION_FIELDS = ("text", "media", "pitch", "dof")
