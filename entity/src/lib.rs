//! SeaORM entities for the tables idsync owns.
