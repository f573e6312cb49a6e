"""DragBench evaluation: Mean Distance (DIFT), Image Fidelity (LPIPS), CLIP similarity."""
