"""Tools that run models over data: caption scoring, filtering and recaptioning now; text
embedding, analysis and sampling later. They sit above zoo.data, zoo.eval and zoo.engine, so
the data layer stays free of models."""
