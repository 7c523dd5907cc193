"""The CEHR-GPT tokenizer: time tokens, value bins, vocabulary, encode and decode."""
