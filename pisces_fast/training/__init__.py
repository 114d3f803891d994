"""Post-training: consistency distillation + reward, GRPO, discriminator-free DPO (LoRA, DeepSpeed)."""
