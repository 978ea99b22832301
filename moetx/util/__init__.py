"""Process and tree utilities every layer may use: XLA and torch start-up settings
(`xla_env`, `torch_env`), gin file lookup (`gin_files`) and parameter-tree flattening (`trees`).
Generated Markdown sections (`markdown`). Nothing here imports another moetx package."""
