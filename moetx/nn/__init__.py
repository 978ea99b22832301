"""Neural-network layers shared by the language-model, MoE and vision stacks (Flax Linen):
dense layers with logical axes, RMSNorm, embeddings, relative position bias, MLPs and
activations (`layers`)."""
