"""The text modality: the frozen causal LM (:mod:`.backbone`), LoRA training (:mod:`.trainer`),
instruction / TSV data and its federations (:mod:`.sources`, :mod:`.federation`,
:mod:`.synthetic`), P / TTP evaluation (:mod:`.protocol`, :mod:`.batched_eval`,
:mod:`.metrics`) and the runner's view of all of it (:mod:`.modality`)."""
