"""A small trained vision-language model: drawn scenes, questions, and the weights.

`load()` returns the shipped toy model (a Qwen2.5-VL trained by `headgain.toy.train`)
and its processor; `headgain.toy.scenes` draws the pictures and asks the questions.
"""
