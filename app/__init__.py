"""The vision_peft browser app (Gradio). Only this package imports gradio."""
