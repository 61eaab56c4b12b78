import Foundation

/// The JSON text of an APNs `userInfo` for `HeraldClient.handlePush(payloadJson:)`: the
/// Herald keys sit at its top level, next to `aps`. Nil if it cannot be encoded.
func pushPayloadJson(_ userInfo: [AnyHashable: Any]) -> String? {
    var object: [String: Any] = [:]
    for (key, value) in userInfo {
        if let name = key as? String, JSONSerialization.isValidJSONObject([name: value]) {
            object[name] = value
        }
    }
    guard let data = try? JSONSerialization.data(withJSONObject: object) else {
        return nil
    }
    return String(data: data, encoding: .utf8)
}
