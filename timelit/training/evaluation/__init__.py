"""Zero-shot evaluation: classification heads from prompts, retrieval recall, and the A_KA / A_ZS summaries."""
