"""The text-to-image diffusion service: its declaration, pipelines and grid jobs land with issue 10."""
