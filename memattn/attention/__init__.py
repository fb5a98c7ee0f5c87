"""Reading and steering a denoiser's text attention: layers, token layouts, the session and its listeners.

``layers`` finds the cross-attention layers and names them; ``tokens`` says which position is BOS,
a prompt word, EOS or padding; ``session`` installs the probes (``processor``) once per denoiser and
hands every layer call to its listeners: ``recorder`` (read by ``trace``) and ``edit`` (the paper's
logit edit, added by ``memattn.mitigate`` and the guard); ``record`` is what a trace returns; ``patch``
is the one way a pipeline method is wrapped and put back.
"""
