//! Alert rules over the signals rampart measures.
