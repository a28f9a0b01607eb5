"""HTTP layer: fal's edit endpoints, schemas, input images, output files and the inference worker."""
