"""Trainers of the plugin's models; ``get_trainer`` finds ``<Model>Trainer`` here before RecBole's."""
