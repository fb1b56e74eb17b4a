"""Structured outputs: constrain sampling to a JSON schema, a regex, a choice or a grammar.

``params.StructuredOutputsParams`` says what a request wants (no grammar engine needed to
build or send it); ``compiler`` turns it into an xgrammar grammar, cached per process;
``manager`` keeps each running request's matcher and fills the step's token bitmask, which
``layers.sampler`` applies on the device.
"""
