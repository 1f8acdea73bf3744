//! Stripe Issuing merchant categories and their merchant category codes (MCCs).
//!
//! Stripe names a merchant's category with a snake_case string
//! (`merchant_data.category` on an Authorization, and the values accepted by
//! `spending_controls.allowed_categories` / `blocked_categories`). Card networks use a
//! four-digit ISO 18245 MCC. This module maps between the two with static tables: no
//! I/O, no allocation, binary search on sorted arrays built at compile time.
//!
//! Where the data comes from:
//!
//! - **Names:** the `allowed_categories` enum of `issuing_card_authorization_controls`
//!   in Stripe's OpenAPI spec for API version 2023-08-16 (295 values). The same 295
//!   names, no more and no fewer, are in async-stripe 1.0.0-rc.10 (`stripe_shared`,
//!   generated for API version 2026-09-30.endive); a test below checks every name
//!   against that crate.
//! - **MCCs:** the table on Stripe's "Issuing merchant categories" page
//!   (docs.stripe.com/issuing/categories), whose names and codes are the same as the
//!   "Merchant category code list" on docs.stripe.com/connect/setting-mcc. The codes
//!   were taken from public copies of those pages (an older and a newer copy of the
//!   Connect list, which agree on every row they share) and spot-checked against the
//!   Issuing page itself. Every category has exactly one code there, and no code
//!   belongs to two categories.
//!
//! Known gaps and quirks, kept as Stripe has them:
//!
//! - `miscellaneous` is Stripe's catch-all for merchants that fit no other category. It
//!   has no MCC of its own, so [`mcc_for_category`] returns `None` for it.
//! - Stripe's table lists one MCC per category and no ranges. Brand-specific codes
//!   (airlines 3000–3299, car rental 3351–3441, lodging 3501–3999) and any other code
//!   not in the table give `None` from [`category_for_mcc`]; this module does not guess
//!   which category Stripe would report for them.
//! - Spellings are Stripe's, typos included (`..._online_casions_...`,
//!   `truck_stop_iteration`, `stationary_office_supplies_...`), and so are a few
//!   assignments that differ from the ISO titles (for example
//!   `motorcycle_shops_dealers` is 5561).
//! - MCCs are numbers here: 0763 is `763`. Format with `{:04}` for display.

/// Every Stripe merchant category, sorted by name (byte order), with its primary MCC.
///
/// This is the single source of truth; the other tables are derived from it at compile
/// time, and the build fails if it is out of order or an MCC repeats.
#[rustfmt::skip]
const CATEGORIES: [(&str, Option<u16>); CATEGORY_COUNT] = [
    ("ac_refrigeration_repair", Some(7623)),
    ("accounting_bookkeeping_services", Some(8931)),
    ("advertising_services", Some(7311)),
    ("agricultural_cooperative", Some(763)),
    ("airlines_air_carriers", Some(4511)),
    ("airports_flying_fields", Some(4582)),
    ("ambulance_services", Some(4119)),
    ("amusement_parks_carnivals", Some(7996)),
    ("antique_reproductions", Some(5937)),
    ("antique_shops", Some(5932)),
    ("aquariums", Some(7998)),
    ("architectural_surveying_services", Some(8911)),
    ("art_dealers_and_galleries", Some(5971)),
    ("artists_supply_and_craft_shops", Some(5970)),
    ("auto_and_home_supply_stores", Some(5531)),
    ("auto_body_repair_shops", Some(7531)),
    ("auto_paint_shops", Some(7535)),
    ("auto_service_shops", Some(7538)),
    ("automated_cash_disburse", Some(6011)),
    ("automated_fuel_dispensers", Some(5542)),
    ("automobile_associations", Some(8675)),
    ("automotive_parts_and_accessories_stores", Some(5533)),
    ("automotive_tire_stores", Some(5532)),
    ("bail_and_bond_payments", Some(9223)),
    ("bakeries", Some(5462)),
    ("bands_orchestras", Some(7929)),
    ("barber_and_beauty_shops", Some(7230)),
    ("betting_casino_gambling", Some(7995)),
    ("bicycle_shops", Some(5940)),
    ("billiard_pool_establishments", Some(7932)),
    ("boat_dealers", Some(5551)),
    ("boat_rentals_and_leases", Some(4457)),
    ("book_stores", Some(5942)),
    ("books_periodicals_and_newspapers", Some(5192)),
    ("bowling_alleys", Some(7933)),
    ("bus_lines", Some(4131)),
    ("business_secretarial_schools", Some(8244)),
    ("buying_shopping_services", Some(7278)),
    ("cable_satellite_and_other_pay_television_and_radio", Some(4899)),
    ("camera_and_photographic_supply_stores", Some(5946)),
    ("candy_nut_and_confectionery_stores", Some(5441)),
    ("car_and_truck_dealers_new_used", Some(5511)),
    ("car_and_truck_dealers_used_only", Some(5521)),
    ("car_rental_agencies", Some(7512)),
    ("car_washes", Some(7542)),
    ("carpentry_services", Some(1750)),
    ("carpet_upholstery_cleaning", Some(7217)),
    ("caterers", Some(5811)),
    ("charitable_and_social_service_organizations_fundraising", Some(8398)),
    ("chemicals_and_allied_products", Some(5169)),
    ("child_care_services", Some(8351)),
    ("childrens_and_infants_wear_stores", Some(5641)),
    ("chiropodists_podiatrists", Some(8049)),
    ("chiropractors", Some(8041)),
    ("cigar_stores_and_stands", Some(5993)),
    ("civic_social_fraternal_associations", Some(8641)),
    ("cleaning_and_maintenance", Some(7349)),
    ("clothing_rental", Some(7296)),
    ("colleges_universities", Some(8220)),
    ("commercial_equipment", Some(5046)),
    ("commercial_footwear", Some(5139)),
    ("commercial_photography_art_and_graphics", Some(7333)),
    ("commuter_transport_and_ferries", Some(4111)),
    ("computer_network_services", Some(4816)),
    ("computer_programming", Some(7372)),
    ("computer_repair", Some(7379)),
    ("computer_software_stores", Some(5734)),
    ("computers_peripherals_and_software", Some(5045)),
    ("concrete_work_services", Some(1771)),
    ("construction_materials", Some(5039)),
    ("consulting_public_relations", Some(7392)),
    ("correspondence_schools", Some(8241)),
    ("cosmetic_stores", Some(5977)),
    ("counseling_services", Some(7277)),
    ("country_clubs", Some(7997)),
    ("courier_services", Some(4215)),
    ("court_costs", Some(9211)),
    ("credit_reporting_agencies", Some(7321)),
    ("cruise_lines", Some(4411)),
    ("dairy_products_stores", Some(5451)),
    ("dance_hall_studios_schools", Some(7911)),
    ("dating_escort_services", Some(7273)),
    ("dentists_orthodontists", Some(8021)),
    ("department_stores", Some(5311)),
    ("detective_agencies", Some(7393)),
    ("digital_goods_applications", Some(5817)),
    ("digital_goods_games", Some(5816)),
    ("digital_goods_large_volume", Some(5818)),
    ("digital_goods_media", Some(5815)),
    ("direct_marketing_catalog_merchant", Some(5964)),
    ("direct_marketing_combination_catalog_and_retail_merchant", Some(5965)),
    ("direct_marketing_inbound_telemarketing", Some(5967)),
    ("direct_marketing_insurance_services", Some(5960)),
    ("direct_marketing_other", Some(5969)),
    ("direct_marketing_outbound_telemarketing", Some(5966)),
    ("direct_marketing_subscription", Some(5968)),
    ("direct_marketing_travel", Some(5962)),
    ("discount_stores", Some(5310)),
    ("doctors", Some(8011)),
    ("door_to_door_sales", Some(5963)),
    ("drapery_window_covering_and_upholstery_stores", Some(5714)),
    ("drinking_places", Some(5813)),
    ("drug_stores_and_pharmacies", Some(5912)),
    ("drugs_drug_proprietaries_and_druggist_sundries", Some(5122)),
    ("dry_cleaners", Some(7216)),
    ("durable_goods", Some(5099)),
    ("duty_free_stores", Some(5309)),
    ("eating_places_restaurants", Some(5812)),
    ("educational_services", Some(8299)),
    ("electric_razor_stores", Some(5997)),
    ("electric_vehicle_charging", Some(5552)),
    ("electrical_parts_and_equipment", Some(5065)),
    ("electrical_services", Some(1731)),
    ("electronics_repair_shops", Some(7622)),
    ("electronics_stores", Some(5732)),
    ("elementary_secondary_schools", Some(8211)),
    ("emergency_services_gcas_visa_use_only", Some(9702)),
    ("employment_temp_agencies", Some(7361)),
    ("equipment_rental", Some(7394)),
    ("exterminating_services", Some(7342)),
    ("family_clothing_stores", Some(5651)),
    ("fast_food_restaurants", Some(5814)),
    ("financial_institutions", Some(6012)),
    ("fines_government_administrative_entities", Some(9222)),
    ("fireplace_fireplace_screens_and_accessories_stores", Some(5718)),
    ("floor_covering_stores", Some(5713)),
    ("florists", Some(5992)),
    ("florists_supplies_nursery_stock_and_flowers", Some(5193)),
    ("freezer_and_locker_meat_provisioners", Some(5422)),
    ("fuel_dealers_non_automotive", Some(5983)),
    ("funeral_services_crematories", Some(7261)),
    ("furniture_home_furnishings_and_equipment_stores_except_appliances", Some(5712)),
    ("furniture_repair_refinishing", Some(7641)),
    ("furriers_and_fur_shops", Some(5681)),
    ("general_services", Some(1520)),
    ("gift_card_novelty_and_souvenir_shops", Some(5947)),
    ("glass_paint_and_wallpaper_stores", Some(5231)),
    ("glassware_crystal_stores", Some(5950)),
    ("golf_courses_public", Some(7992)),
    ("government_licensed_horse_dog_racing_us_region_only", Some(7802)),
    ("government_licensed_online_casions_online_gambling_us_region_only", Some(7801)),
    ("government_owned_lotteries_non_us_region", Some(9406)),
    ("government_owned_lotteries_us_region_only", Some(7800)),
    ("government_services", Some(9399)),
    ("grocery_stores_supermarkets", Some(5411)),
    ("hardware_equipment_and_supplies", Some(5072)),
    ("hardware_stores", Some(5251)),
    ("health_and_beauty_spas", Some(7298)),
    ("hearing_aids_sales_and_supplies", Some(5975)),
    ("heating_plumbing_a_c", Some(1711)),
    ("hobby_toy_and_game_shops", Some(5945)),
    ("home_supply_warehouse_stores", Some(5200)),
    ("hospitals", Some(8062)),
    ("hotels_motels_and_resorts", Some(7011)),
    ("household_appliance_stores", Some(5722)),
    ("industrial_supplies", Some(5085)),
    ("information_retrieval_services", Some(7375)),
    ("insurance_default", Some(6399)),
    ("insurance_underwriting_premiums", Some(6300)),
    ("intra_company_purchases", Some(9950)),
    ("jewelry_stores_watches_clocks_and_silverware_stores", Some(5944)),
    ("landscaping_services", Some(780)),
    ("laundries", Some(7211)),
    ("laundry_cleaning_services", Some(7210)),
    ("legal_services_attorneys", Some(8111)),
    ("luggage_and_leather_goods_stores", Some(5948)),
    ("lumber_building_materials_stores", Some(5211)),
    ("manual_cash_disburse", Some(6010)),
    ("marinas_service_and_supplies", Some(4468)),
    ("marketplaces", Some(5262)),
    ("masonry_stonework_and_plaster", Some(1740)),
    ("massage_parlors", Some(7297)),
    ("medical_and_dental_labs", Some(8071)),
    ("medical_dental_ophthalmic_and_hospital_equipment_and_supplies", Some(5047)),
    ("medical_services", Some(8099)),
    ("membership_organizations", Some(8699)),
    ("mens_and_boys_clothing_and_accessories_stores", Some(5611)),
    ("mens_womens_clothing_stores", Some(5691)),
    ("metal_service_centers", Some(5051)),
    ("miscellaneous", None),
    ("miscellaneous_apparel_and_accessory_shops", Some(5699)),
    ("miscellaneous_auto_dealers", Some(5599)),
    ("miscellaneous_business_services", Some(7399)),
    ("miscellaneous_food_stores", Some(5499)),
    ("miscellaneous_general_merchandise", Some(5399)),
    ("miscellaneous_general_services", Some(7299)),
    ("miscellaneous_home_furnishing_specialty_stores", Some(5719)),
    ("miscellaneous_publishing_and_printing", Some(2741)),
    ("miscellaneous_recreation_services", Some(7999)),
    ("miscellaneous_repair_shops", Some(7699)),
    ("miscellaneous_specialty_retail", Some(5999)),
    ("mobile_home_dealers", Some(5271)),
    ("motion_picture_theaters", Some(7832)),
    ("motor_freight_carriers_and_trucking", Some(4214)),
    ("motor_homes_dealers", Some(5592)),
    ("motor_vehicle_supplies_and_new_parts", Some(5013)),
    ("motorcycle_shops_and_dealers", Some(5571)),
    ("motorcycle_shops_dealers", Some(5561)),
    ("music_stores_musical_instruments_pianos_and_sheet_music", Some(5733)),
    ("news_dealers_and_newsstands", Some(5994)),
    ("non_fi_money_orders", Some(6051)),
    ("non_fi_stored_value_card_purchase_load", Some(6540)),
    ("nondurable_goods", Some(5199)),
    ("nurseries_lawn_and_garden_supply_stores", Some(5261)),
    ("nursing_personal_care", Some(8050)),
    ("office_and_commercial_furniture", Some(5021)),
    ("opticians_eyeglasses", Some(8043)),
    ("optometrists_ophthalmologist", Some(8042)),
    ("orthopedic_goods_prosthetic_devices", Some(5976)),
    ("osteopaths", Some(8031)),
    ("package_stores_beer_wine_and_liquor", Some(5921)),
    ("paints_varnishes_and_supplies", Some(5198)),
    ("parking_lots_garages", Some(7523)),
    ("passenger_railways", Some(4112)),
    ("pawn_shops", Some(5933)),
    ("pet_shops_pet_food_and_supplies", Some(5995)),
    ("petroleum_and_petroleum_products", Some(5172)),
    ("photo_developing", Some(7395)),
    ("photographic_photocopy_microfilm_equipment_and_supplies", Some(5044)),
    ("photographic_studios", Some(7221)),
    ("picture_video_production", Some(7829)),
    ("piece_goods_notions_and_other_dry_goods", Some(5131)),
    ("plumbing_heating_equipment_and_supplies", Some(5074)),
    ("political_organizations", Some(8651)),
    ("postal_services_government_only", Some(9402)),
    ("precious_stones_and_metals_watches_and_jewelry", Some(5094)),
    ("professional_services", Some(8999)),
    ("public_warehousing_and_storage", Some(4225)),
    ("quick_copy_repro_and_blueprint", Some(7338)),
    ("railroads", Some(4011)),
    ("real_estate_agents_and_managers_rentals", Some(6513)),
    ("record_stores", Some(5735)),
    ("recreational_vehicle_rentals", Some(7519)),
    ("religious_goods_stores", Some(5973)),
    ("religious_organizations", Some(8661)),
    ("roofing_siding_sheet_metal", Some(1761)),
    ("secretarial_support_services", Some(7339)),
    ("security_brokers_dealers", Some(6211)),
    ("service_stations", Some(5541)),
    ("sewing_needlework_fabric_and_piece_goods_stores", Some(5949)),
    ("shoe_repair_hat_cleaning", Some(7251)),
    ("shoe_stores", Some(5661)),
    ("small_appliance_repair", Some(7629)),
    ("snowmobile_dealers", Some(5598)),
    ("special_trade_services", Some(1799)),
    ("specialty_cleaning", Some(2842)),
    ("sporting_goods_stores", Some(5941)),
    ("sporting_recreation_camps", Some(7032)),
    ("sports_and_riding_apparel_stores", Some(5655)),
    ("sports_clubs_fields", Some(7941)),
    ("stamp_and_coin_stores", Some(5972)),
    ("stationary_office_supplies_printing_and_writing_paper", Some(5111)),
    ("stationery_stores_office_and_school_supply_stores", Some(5943)),
    ("swimming_pools_sales", Some(5996)),
    ("t_ui_travel_germany", Some(4723)),
    ("tailors_alterations", Some(5697)),
    ("tax_payments_government_agencies", Some(9311)),
    ("tax_preparation_services", Some(7276)),
    ("taxicabs_limousines", Some(4121)),
    ("telecommunication_equipment_and_telephone_sales", Some(4812)),
    ("telecommunication_services", Some(4814)),
    ("telegraph_services", Some(4821)),
    ("tent_and_awning_shops", Some(5998)),
    ("testing_laboratories", Some(8734)),
    ("theatrical_ticket_agencies", Some(7922)),
    ("timeshares", Some(7012)),
    ("tire_retreading_and_repair", Some(7534)),
    ("tolls_bridge_fees", Some(4784)),
    ("tourist_attractions_and_exhibits", Some(7991)),
    ("towing_services", Some(7549)),
    ("trailer_parks_campgrounds", Some(7033)),
    ("transportation_services", Some(4789)),
    ("travel_agencies_tour_operators", Some(4722)),
    ("truck_stop_iteration", Some(7511)),
    ("truck_utility_trailer_rentals", Some(7513)),
    ("typesetting_plate_making_and_related_services", Some(2791)),
    ("typewriter_stores", Some(5978)),
    ("u_s_federal_government_agencies_or_departments", Some(9405)),
    ("uniforms_commercial_clothing", Some(5137)),
    ("used_merchandise_and_secondhand_stores", Some(5931)),
    ("utilities", Some(4900)),
    ("variety_stores", Some(5331)),
    ("veterinary_services", Some(742)),
    ("video_amusement_game_supplies", Some(7993)),
    ("video_game_arcades", Some(7994)),
    ("video_tape_rental_stores", Some(7841)),
    ("vocational_trade_schools", Some(8249)),
    ("watch_jewelry_repair", Some(7631)),
    ("welding_repair", Some(7692)),
    ("wholesale_clubs", Some(5300)),
    ("wig_and_toupee_stores", Some(5698)),
    ("wires_money_orders", Some(4829)),
    ("womens_accessory_and_specialty_shops", Some(5631)),
    ("womens_ready_to_wear_stores", Some(5621)),
    ("wrecking_and_salvage_yards", Some(5935)),
];

const CATEGORY_COUNT: usize = 295;
const MCC_COUNT: usize = count_mccs();

/// Category names alone, in the same order as [`CATEGORIES`].
static NAMES: [&str; CATEGORY_COUNT] = names();

/// `(mcc, category)` for every category that has an MCC, sorted by MCC.
static BY_MCC: [(u16, &str); MCC_COUNT] = by_mcc();

// The binary searches below rely on these; checking them here turns a bad edit of the
// table into a build error rather than a wrong answer at run time.
const _: () = assert!(
    names_strictly_sorted(),
    "CATEGORIES must be sorted by name, without duplicates"
);
const _: () = assert!(mccs_strictly_sorted(), "an MCC appears twice in CATEGORIES");
const _: () = assert!(
    mccs_in_range(),
    "an MCC in CATEGORIES has more than four digits"
);

/// Whether `name` is one of Stripe's merchant categories (exact, case-sensitive match).
pub fn is_known_category(name: &str) -> bool {
    find(name).is_some()
}

/// The Stripe category for a merchant category code, if Stripe's table lists that code.
pub fn category_for_mcc(mcc: u16) -> Option<&'static str> {
    let i = BY_MCC.binary_search_by_key(&mcc, |&(code, _)| code).ok()?;
    BY_MCC.get(i).map(|&(_, name)| name)
}

/// The primary MCC of a Stripe category. `None` for unknown names and for
/// `miscellaneous`, which has no code of its own.
pub fn mcc_for_category(name: &str) -> Option<u16> {
    find(name).and_then(|&(_, mcc)| mcc)
}

/// All Stripe merchant category names, sorted.
pub fn all_categories() -> &'static [&'static str] {
    &NAMES
}

fn find(name: &str) -> Option<&'static (&'static str, Option<u16>)> {
    let i = CATEGORIES.binary_search_by(|&(n, _)| n.cmp(name)).ok()?;
    CATEGORIES.get(i)
}

// === compile-time table builders ===

const fn count_mccs() -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < CATEGORY_COUNT {
        if CATEGORIES[i].1.is_some() {
            n += 1;
        }
        i += 1;
    }
    n
}

const fn names() -> [&'static str; CATEGORY_COUNT] {
    let mut out = [""; CATEGORY_COUNT];
    let mut i = 0;
    while i < CATEGORY_COUNT {
        out[i] = CATEGORIES[i].0;
        i += 1;
    }
    out
}

/// Insertion sort by MCC; a few hundred entries, evaluated once by the compiler.
const fn by_mcc() -> [(u16, &'static str); MCC_COUNT] {
    let mut out = [(0, ""); MCC_COUNT];
    let mut n = 0;
    let mut i = 0;
    while i < CATEGORY_COUNT {
        if let Some(mcc) = CATEGORIES[i].1 {
            let mut j = n;
            while j > 0 && out[j - 1].0 > mcc {
                out[j] = out[j - 1];
                j -= 1;
            }
            out[j] = (mcc, CATEGORIES[i].0);
            n += 1;
        }
        i += 1;
    }
    out
}

/// Byte-wise `a < b`, the same order as `str::cmp`.
const fn str_less(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut i = 0;
    while i < a.len() && i < b.len() {
        if a[i] != b[i] {
            return a[i] < b[i];
        }
        i += 1;
    }
    a.len() < b.len()
}

const fn names_strictly_sorted() -> bool {
    let mut i = 1;
    while i < CATEGORY_COUNT {
        if !str_less(CATEGORIES[i - 1].0, CATEGORIES[i].0) {
            return false;
        }
        i += 1;
    }
    true
}

const fn mccs_strictly_sorted() -> bool {
    let table = by_mcc();
    let mut i = 1;
    while i < MCC_COUNT {
        if table[i - 1].0 >= table[i].0 {
            return false;
        }
        i += 1;
    }
    true
}

const fn mccs_in_range() -> bool {
    let mut i = 0;
    while i < CATEGORY_COUNT {
        if let Some(mcc) = CATEGORIES[i].1
            && mcc > 9999
        {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pairs read off Stripe's table, chosen to cover odd corners: leading-zero codes,
    /// the 2023+ additions, Stripe's misspelt names, and common agent purchases.
    const KNOWN: &[(&str, u16)] = &[
        ("betting_casino_gambling", 7995),
        ("taxicabs_limousines", 4121),
        ("computer_software_stores", 5734),
        ("ac_refrigeration_repair", 7623),
        ("agricultural_cooperative", 763),
        ("veterinary_services", 742),
        ("landscaping_services", 780),
        ("airlines_air_carriers", 4511),
        ("hotels_motels_and_resorts", 7011),
        ("eating_places_restaurants", 5812),
        ("fast_food_restaurants", 5814),
        ("grocery_stores_supermarkets", 5411),
        ("digital_goods_applications", 5817),
        ("computer_network_services", 4816),
        ("automated_cash_disburse", 6011),
        ("manual_cash_disburse", 6010),
        ("wires_money_orders", 4829),
        ("non_fi_stored_value_card_purchase_load", 6540),
        ("electric_vehicle_charging", 5552),
        ("marketplaces", 5262),
        ("emergency_services_gcas_visa_use_only", 9702),
        ("government_owned_lotteries_us_region_only", 7800),
        (
            "government_licensed_online_casions_online_gambling_us_region_only",
            7801,
        ),
        ("government_licensed_horse_dog_racing_us_region_only", 7802),
        ("government_owned_lotteries_non_us_region", 9406),
        ("truck_stop_iteration", 7511),
        ("t_ui_travel_germany", 4723),
        ("intra_company_purchases", 9950),
    ];

    #[test]
    fn known_pairs_map_both_ways() {
        for &(name, mcc) in KNOWN {
            assert_eq!(mcc_for_category(name), Some(mcc), "{name}");
            assert_eq!(category_for_mcc(mcc), Some(name), "{mcc:04}");
            assert!(is_known_category(name), "{name}");
        }
    }

    #[test]
    fn every_mcc_round_trips() {
        let mut with_mcc = 0;
        for &name in all_categories() {
            if let Some(mcc) = mcc_for_category(name) {
                assert_eq!(category_for_mcc(mcc), Some(name), "{name} -> {mcc:04}");
                with_mcc += 1;
            }
        }
        assert_eq!(with_mcc, 294);
        for &(mcc, name) in &BY_MCC {
            assert_eq!(mcc_for_category(name), Some(mcc), "{mcc:04} -> {name}");
        }
    }

    #[test]
    fn list_is_sorted_unique_and_complete() {
        let all = all_categories();
        assert_eq!(all.len(), 295);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert!(all.iter().all(|n| is_known_category(n)));
        assert!(BY_MCC.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn miscellaneous_is_known_but_has_no_mcc() {
        assert!(is_known_category("miscellaneous"));
        assert_eq!(mcc_for_category("miscellaneous"), None);
    }

    #[test]
    fn unknown_names_and_codes_give_none() {
        for name in [
            "",
            "gambling",
            "Betting_Casino_Gambling",
            "betting_casino_gambling ",
            "government_licensed_online_casinos_online_gambling_us_region_only",
            "zzz",
        ] {
            assert!(!is_known_category(name), "{name:?}");
            assert_eq!(mcc_for_category(name), None, "{name:?}");
        }
        // 3000 (United Airlines) and 3501 (a hotel chain) are real MCCs, but Stripe's
        // table names no category for brand-specific codes.
        for mcc in [0, 1, 3000, 3501, 5555, 9999, 10_000, u16::MAX] {
            assert_eq!(category_for_mcc(mcc), None, "{mcc}");
        }
    }

    #[test]
    fn every_name_is_a_category_async_stripe_knows() {
        use stripe_shared::IssuingCardAuthorizationControlsAllowedCategories as Stripe;
        for &name in all_categories() {
            let parsed: Stripe = name.parse().unwrap();
            assert!(!matches!(parsed, Stripe::Unknown(_)), "{name}");
            assert_eq!(parsed.as_str(), name);
        }
    }
}
