//! The model families, one module each; [`crate::config::ModelFamily`] names them.
//!
//! `llava` is the model all three families share: vision tower → feature selection → projector
//! → merge → decoder. LLaVA-NeXT and LLaVA-OneVision differ from LLaVA only in how an image
//! becomes its rows of features, which `anyres` holds (tiles in, packed features out).

pub mod anyres;
pub mod llava;
