"""What the commands import for plumbing, kept apart from what a reader studies (bdia.py, models.py,
gpt2.py and the scripts at the root): the life of a run in its folder (runlib.py), torchrun and
FSDP2 (distributed.py), data files and verified downloads (data.py), the ViT recipe's RandAugment
(randaugment.py), the scores of generated text (metrics.py), GPT-2's files and tokenizer
(gpt2_files.py). The scripts import them as `from plumbing import runlib`."""
