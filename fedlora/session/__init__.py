"""A run's life, one module per concern: start / resume / signals (:mod:`.lifecycle`), where a resume
starts (:mod:`.resume`), what the run folder records (:mod:`.run_info`), export (:mod:`.export`) and
evaluating a finished run (:mod:`.evaluate`). ``fedlora.runner`` is the public face of all of them."""
