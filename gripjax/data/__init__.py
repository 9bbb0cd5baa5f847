"""Data: the GRIP-Bench generator and tfds builder, the word tokenizer, numpy batch pipeline."""
