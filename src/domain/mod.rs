//! Pure domain types: money, purchase intents, merchants, categories and calendar periods.
//! Nothing here does I/O or reads a clock.

pub mod category;
pub mod intent;
pub mod merchant;
pub mod money;
pub mod time;
