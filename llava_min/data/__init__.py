"""Data: images to pixel_values (image.py), the official LLaVA record format to training batches
(dataset.py), and the GPT-assisted instruction data of LLaVA Sec. 3 (gpt_data.py, asked of teacher.py)."""
