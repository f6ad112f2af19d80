"""ct-liver: liver and liver lesions on CT (liver on MR) with the pyliverlesionseg 0.3 networks."""
