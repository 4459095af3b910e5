//! The config loader: any YAML text is loaded or refused with a list of problems; a loaded
//! config always builds its state and settings.
#![no_main]

use hboned::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, &|_| None) {
        let _ = hboned::state::State::from_config(&config);
        let _ = hboned::xds::XdsSettings::from_config(&config);
        let _ = (
            config.connect_timeout(),
            config.drain_timeout(),
            config.cert_lifetime(),
        );
    }
});
